"""The paper's metrics (Sec. 4.1), a folder scored with them, and the published scores beside a run's.
"""
