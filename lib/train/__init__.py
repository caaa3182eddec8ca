"""The train wing (`make train`, jobs/train.py): config, data stream, samples, model, Trainer, checkpoints."""
