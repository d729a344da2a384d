"""Shared names: the ``Compressed`` payload, optimizer state keys and error classes.

State keys are grouped by checkpoint policy (Distributed Shampoo's habit). The optimizers
keep one flat buffer per communication bucket (all trainable parameters of one dtype and device,
across parameter groups), stored in ``optimizer.state[bucket.params[0]]`` (``optim.base.Bucket``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Compressed(NamedTuple):
    """What a compressor produces for one vector (one shard) before it goes on the wire.

    ``payload``: packed sign bits (uint8), top-k values, or rand-k values.
    ``scale``: one scale per block for sign compressors; indices (int64) for top-k; empty otherwise.
    ``numel``: real coordinates (padding excluded). ``block_sizes``: the block layout used.
    """

    payload: torch.Tensor
    scale: torch.Tensor
    numel: int
    block_sizes: tuple[int, ...]


# Keys for optimizer state (identical on every rank). What each buffer is (full or shard, rank-identical
# or per-rank) is declared where it is made: ``Exchange.STATE`` and ``CompressedOptimizer.STATE``.
STEP = "step"
EXP_AVG = "exp_avg"  # m_t
EXP_AVG_SQ = "exp_avg_sq"  # v_t
MAX_EXP_AVG_SQ = "max_exp_avg_sq"  # \hat v_t
DOWN_MARKOV_STATE = "down_markov_state"  # \tilde g_t, the server->worker Markov state (same on all ranks)
# fp32 master copy of a group's fp16/bf16 parameters (flat; absent for fp32/fp64 parameters). The
# update is applied to it and the parameters receive it rounded to their dtype.
MASTER_PARAMS = "master_params"
SERVER_ESTIMATE = "server_estimate"  # LIEC-SGD: the server's last message as every worker decoded it
# 1-bit LAMB (upstream OnebitLamb's names): the variance that keeps adapting after the freeze, and the
# fused buffer's padding slots (they keep the last exchange's output, as upstream's dummy tensor does).
EXP_AVG_SQ_FRESH = "exp_avg_sq_fresh"
EXP_AVG_PADDING = "exp_avg_padding"
# 1-bit LAMB's per-parameter floats, in ``optimizer.state[p]`` of each parameter as upstream keeps them.
LAMB_COEFF_FREEZE = "lamb_coeff_freeze"  # running average of the warm-up trust ratio
LAST_FACTOR = "last_factor"  # the variance factor of the last compressed step
SCALING_COEFF = "scaling_coeff"  # equalises the tensors' momentum scales before the fused exchange

# Keys for per-rank state (differs between ranks; saved per rank by the DeepSpeed integration).
MARKOV_STATE = "markov_state"  # \hat g^{(i)}_t, worker i's Markov state
SERVER_MARKOV_STATE = "server_markov_state"  # \hat g_t restricted to this rank's server shard
WORKER_ERROR = "worker_error"  # e_t, worker error-feedback buffer (1-bit Adam)
SERVER_ERROR = "server_error"  # \bar e_t, server error-feedback buffer on this rank's shard
EXP_AVG_ABS = "exp_avg_abs"  # Birder: b_i, worker i's EMA of |g| (its m_i is exp_avg, per rank too)
MAX_EXP_AVG_ABS = "max_exp_avg_abs"  # Birder: \hat b_i, the running max of b_i (Algorithm 1's AMSGrad-style step)
MOMENTUM_BUFFER = "momentum_buffer"  # LIEC-SGD: worker i's own SGD momentum (torch.optim.SGD's name)
MOMENTUM_ACCUMULATOR = "momentum_accumulator"  # 0/1 Adam: u_i, this rank's update since the last sync
# 0/1 Adam: the lr summed since the last sync, one Python float per parameter-group segment (upstream's
# per-parameter "lrs"); the same on every rank
LRS = "lrs"
PREVIOUS_GRAD = "previous_grad"  # AdaCGD: y_i, worker i's gradient of the previous step (its 3PC anchor y)
SERVER_PREVIOUS_MARKOV_STATE = "server_previous_markov_state"  # AdaCGD: ghat of the previous step, this shard
# AdaCGD: True (every rank alike) after its compression state was reset: the next step is exact again
SEQUENCES_RESTART = "sequences_restart"



class CommTimeoutError(RuntimeError):
    """A collective did not complete within the configured timeout (a peer died or stalled)."""
