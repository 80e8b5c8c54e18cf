"""TCS-MAE pretraining: config, model, losses, training step and loop, and the commands
`pretrain`, `export` and `recon-ssim`.
"""
