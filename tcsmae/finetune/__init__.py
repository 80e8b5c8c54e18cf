"""Fine-tuning a U-Net from exported weights: patient-grouped folds, DSC/HD95, reports,
`predict` and `visualize` (docs/finetune.md).
"""
