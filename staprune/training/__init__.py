"""Training pruned (or dense) video models, the pieces ``staprune finetune`` is built from:

* :mod:`.optim`: AdamW with weight decay on weight matrices, the linear scaling rule, warm-up + cosine;
* :mod:`.recipe`: the recipe a run is defined by, the resume check, the per-epoch data plan;
* :mod:`.step`: one training step (autocast, label smoothing, clipping) and ``torch.compile`` with
  an eager fallback;
* :mod:`.guards`: gradient checkpointing where pruning allows it, and the check that no pruning
  step was re-run in backward;
* :mod:`.sharding`: each rank's slice of every global batch, every rank's RNG state;
* :mod:`.checkpoint`: the three-file checkpoint of an epoch (optimizer state flattened), resuming;
* :mod:`.loop`: one epoch;
* :mod:`.evaluation`: top-1 of the trained model, on clips in memory or a video list.

The clip sets trained on are :mod:`staprune.data.clips`'s.
"""

from .checkpoint import (
    FORMAT_VERSION,
    flatten_optimizer,
    load_checkpoint,
    resume_from,
    resume_latest,
    save_checkpoint,
    unflatten_optimizer,
)
from .evaluation import eval_entries, evaluate_clips, evaluate_list, top1_on_clips
from .guards import (
    assert_pruned_once,
    check_gradient_checkpointing,
    checkpointing_enabled,
    enable_checkpointing,
)
from .loop import Trainer, build_trainer, train_epoch
from .optim import build_optimizer, lr_at, param_groups, scaled_lr
from .recipe import RECIPE_KEYS, check_recipe, epoch_plan, make_recipe, mix_seed
from .sharding import data_parallel, gather_rng_states, rank_batches
from .step import AUTOCAST, StepConfig, apply_pruning, logits_of, train_step, try_compile

__all__ = [
    "AUTOCAST",
    "FORMAT_VERSION",
    "RECIPE_KEYS",
    "StepConfig",
    "Trainer",
    "apply_pruning",
    "assert_pruned_once",
    "build_optimizer",
    "build_trainer",
    "check_gradient_checkpointing",
    "check_recipe",
    "checkpointing_enabled",
    "data_parallel",
    "enable_checkpointing",
    "epoch_plan",
    "eval_entries",
    "evaluate_clips",
    "evaluate_list",
    "flatten_optimizer",
    "gather_rng_states",
    "load_checkpoint",
    "logits_of",
    "lr_at",
    "make_recipe",
    "mix_seed",
    "param_groups",
    "rank_batches",
    "resume_from",
    "resume_latest",
    "save_checkpoint",
    "scaled_lr",
    "train_epoch",
    "top1_on_clips",
    "train_step",
    "try_compile",
    "unflatten_optimizer",
]
