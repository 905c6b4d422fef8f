"""Reading and writing XPSR weights: the official checkpoint folder, the pack's single file, the SD1.5 base.
"""
