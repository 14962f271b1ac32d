from tuneforge.train.recipe import finetune

__all__ = ["finetune"]
