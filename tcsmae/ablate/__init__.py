"""`tcsmae ablate`: grids of pretraining objectives, each pretrained, exported, fine-tuned on
the same folds and reported against scratch (grid.py the arms and settings, run.py the
resumable steps, summary.py and figures.py the results; command.py the CLI)."""
