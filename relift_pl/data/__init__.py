from relift_pl.data.datamodule import ReLIFTDataModule
from relift_pl.data.templates import prompt_ids, prompt_text, resolve_chat_template

__all__ = ["ReLIFTDataModule", "prompt_ids", "prompt_text", "resolve_chat_template"]
