"""The networks of XPSR, in the official checkpoint's key layout: the SFA-ControlNet (paper Sec. 3.4, Eq. 1-2),
the UNet's conditional attention, and an SD UNet for running and training them outside ComfyUI.
"""
