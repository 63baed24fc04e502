"""Training: multi-task pretraining, head probing and VLA finetuning on torch.distributed."""
