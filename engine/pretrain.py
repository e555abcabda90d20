"""Reproducible pretraining of the bundled mini models in assets/.

`python -m engine pretrain vision` -> assets/mini-resnet18/
`python -m engine pretrain text`   -> assets/mini-gpt2/
"""
