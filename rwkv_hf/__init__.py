"""rwkv_hf: RWKV-4/5.2/6/7 as first-class Hugging Face transformers models.

Importing the package registers the classes with the Auto* factories, so a converted folder loads with
``AutoModelForCausalLM.from_pretrained(folder)`` without ``trust_remote_code``.
"""

__version__ = "0.3.0"

import sys

import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_rwkv_hf import RwkvCache
from .configuration_rwkv_hf import RwkvConfig
from .modeling_rwkv_hf import RwkvForCausalLM, RwkvHfForCausalLM, RwkvHfModel, RwkvModel, RwkvPreTrainedModel


AutoConfig.register(RwkvConfig.model_type, RwkvConfig, exist_ok=True)
# exist_ok: transformers' built-in RWKV-4 config is also *named* RwkvConfig, and the Auto mappings key on names.
AutoModel.register(RwkvConfig, RwkvModel, exist_ok=True)
AutoModelForCausalLM.register(RwkvConfig, RwkvForCausalLM, exist_ok=True)
# save_pretrained / push_to_hub copy the code files of classes registered for an Auto class, so that the folder
# loads with trust_remote_code where this package is not installed.
RwkvConfig.register_for_auto_class()
RwkvModel.register_for_auto_class("AutoModel")
RwkvForCausalLM.register_for_auto_class("AutoModelForCausalLM")

try:
    from transformers import AutoTokenizer

    from .tokenization_rwkv_hf import Rwkv20BTokenizer, RwkvWorldTokenizer, RwkvWorldTokenizerFast

    # Two registrations: the first makes the 20B class name resolvable from a folder's tokenizer_config.json,
    # the last is the default; its slow/fast pair makes the name "RwkvWorldTokenizer" resolve to the fast class.
    AutoTokenizer.register(RwkvConfig, tokenizer_class=Rwkv20BTokenizer, exist_ok=True)
    AutoTokenizer.register(
        RwkvConfig, slow_tokenizer_class=RwkvWorldTokenizer, fast_tokenizer_class=RwkvWorldTokenizerFast, exist_ok=True
    )
    Rwkv20BTokenizer.register_for_auto_class("AutoTokenizer")
    RwkvWorldTokenizer.register_for_auto_class("AutoTokenizer")
    RwkvWorldTokenizerFast.register_for_auto_class("AutoTokenizer")
except ImportError:  # pragma: no cover - while the tokenizer module is being written
    pass

from .convert_rwkv_hf import convert_rwkv_checkpoint
from .state_rwkv_hf import (
    InitState,
    StateFileError,
    convert_state_file,
    create_state_optimizer,
    load_init_state,
    make_init_state_trainable,
    mix_init_states,
    save_init_state,
    state_tuning_training_arguments,
    unload_init_state,
)
from . import demo

try:  # state tuning as a PEFT method, when peft is installed
    from .peft_rwkv_hf import StateTuningConfig, register_state_tuning

    register_state_tuning()
except ImportError:
    StateTuningConfig = None

__all__ = [
    "RwkvCache",
    "RwkvConfig",
    "RwkvForCausalLM",
    "RwkvModel",
    "RwkvHfForCausalLM",
    "RwkvHfModel",
    "RwkvPreTrainedModel",
    "convert_rwkv_checkpoint",
    "InitState",
    "StateFileError",
    "StateTuningConfig",
    "convert_state_file",
    "create_state_optimizer",
    "load_init_state",
    "make_init_state_trainable",
    "mix_init_states",
    "save_init_state",
    "state_tuning_training_arguments",
    "unload_init_state",
]


def _expose_architecture_names():
    """TRL, `transformers serve` and others load a folder with getattr(transformers, config.architectures[0]): our
    classes' own names (never "RwkvForCausalLM", transformers' RWKV-4) resolve there once rwkv_hf is imported. Set
    on the module object as it is at the end of this import (transformers' lazy module may have been replaced in
    sys.modules by then) and on the one imported first."""
    for module in {id(m): m for m in (transformers, sys.modules.get("transformers")) if m is not None}.values():
        for cls in (RwkvHfModel, RwkvHfForCausalLM):
            if cls.__name__ not in vars(module):
                setattr(module, cls.__name__, cls)


_expose_architecture_names()
