from relift_pl.data.datamodule import ReLIFTDataModule
from relift_pl.data.templates import demonstration_ids, prompt_ids

__all__ = ["ReLIFTDataModule", "demonstration_ids", "prompt_ids"]
