"""The MLLM prompts of XPSR (paper Sec. 3.3): instructions, caption files, captioning a dataset.
"""
