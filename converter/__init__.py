"""mergequant.convert: load a Llama-family checkpoint (Hugging Face or GGUF), run the fp32 numpy
reference, and write the .mq model file the engine executes."""
from .config import LlamaConfig, UnsupportedModelError
from .convert import convert
from .inspect import inspect_model
from .loaders import Checkpoint, load_checkpoint
from .mqfile import MqFile, read_mq, write_mq
from .reference import ReferenceModel, reference_from_mq
from .schemes import SCHEMES, get_scheme, pack_linear

__all__ = ["Checkpoint", "LlamaConfig", "MqFile", "ReferenceModel", "SCHEMES", "UnsupportedModelError",
           "convert", "get_scheme", "inspect_model", "load_checkpoint", "pack_linear", "read_mq",
           "reference_from_mq", "write_mq"]
