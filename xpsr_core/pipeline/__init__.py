"""The official inference path around the models: prompts, schedule and start latent, image sizes,
latent tiles, colour fix.
"""
