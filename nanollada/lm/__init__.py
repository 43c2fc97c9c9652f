"""LightningModules, one per paradigm, over the shared backbone."""

from nanollada.lm.ar import ARLM
from nanollada.lm.block_diffusion import BlockDiffusionLM, BlockSizeSchedule
from nanollada.lm.diffusion import MaskedDiffusionLM
from nanollada.lm.dpo import ARDPO, BlockDiffusionDPO, MaskedDiffusionDPO
from nanollada.lm.base import LanguageModel, LoadedModel, load_checkpoint

# The training class of every paradigm, by the ``paradigm`` key its checkpoints carry (inference: nanollada.paradigms).
# The DPO modules (lm/dpo.py) write their backbone's paradigm key too.
LM_CLASSES: dict[str, type[LanguageModel]] = {cls.paradigm: cls for cls in (ARLM, MaskedDiffusionLM,
                                                                                BlockDiffusionLM)}

__all__ = ["ARDPO", "ARLM", "BlockDiffusionDPO", "BlockDiffusionLM", "BlockSizeSchedule", "MaskedDiffusionDPO",
           "MaskedDiffusionLM", "LanguageModel", "LoadedModel", "LM_CLASSES", "load_checkpoint"]
