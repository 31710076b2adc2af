"""Evaluating trained checkpoints: validation loss, sampling, HumanEval, multiple-choice tasks."""
