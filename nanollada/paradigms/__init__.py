"""Everything after training, one class per paradigm behind one interface (see ``base.py``), chosen by name."""

from nanollada.paradigms.base import (PARADIGMS, Generation, Paradigm, ScoringSettings, paradigm_class,
                                      register_paradigm)
from nanollada.paradigms import ar as _ar  # noqa: F401  (registers "ar")
from nanollada.paradigms import masked_diffusion as _masked_diffusion  # noqa: F401  (registers "diffusion")
from nanollada.paradigms import block_diffusion as _block_diffusion  # noqa: F401  (registers "block_diffusion")

__all__ = ["PARADIGMS", "Generation", "Paradigm", "ScoringSettings", "paradigm_class", "register_paradigm"]
