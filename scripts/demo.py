"""Head-to-head on 2 CPU ranks: CD-Adam vs 1-bit Adam vs Adam, printing loss and bytes sent.

    torchrun --standalone --nproc_per_node 2 scripts/demo.py [--steps 300]

(`make demo` installs everything and runs this.) Each rank holds its own half of a synthetic
10-class data set and trains the same small MLP; the optimizers average over ranks themselves.
Bytes are what one rank sends per step under ring/pairwise collectives (deepspeed_cdadam.comm.accounting).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os

import torch
import torch.distributed as dist

from deepspeed_cdadam import CDAdam, OneBitAdam

# ---------------------------------------------------------------------------- config
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--batch", type=int, default=64, help="per rank")
parser.add_argument("--log-every", type=int, default=50)
parser.add_argument(
    "--block-size", type=int, default=2048, help="CD-Adam coordinates per scale (0: one per shard, as the paper)"
)
args = parser.parse_args()

torch.set_num_threads(1)
if torch.cuda.is_available():  # one GPU per rank, NCCL; gloo on CPU
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120))
else:
    device = torch.device("cpu")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
rank, world = dist.get_rank(), dist.get_world_size()
logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
log = logging.getLogger("demo")

# ---------------------------------------------------------------------------- data
gen = torch.Generator().manual_seed(0)
centers = torch.randn(10, 32, generator=gen) * 1.5
labels_all = torch.randint(0, 10, (8000,), generator=gen)
feats_all = centers[labels_all] + torch.randn(8000, 32, generator=gen) * 3.0
train_x, train_y = feats_all[:6000][rank::world].to(device), labels_all[:6000][rank::world].to(device)  # own half
test_x, test_y = feats_all[6000:].to(device), labels_all[6000:].to(device)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # same init on every rank and for every optimizer
    return torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)
    ).to(device)


OPTIMIZERS = {
    "CD-Adam": lambda ps: CDAdam(ps, lr=args.lr, block_size=args.block_size or None),
    "1-bit Adam": lambda ps: OneBitAdam(ps, lr=args.lr, freeze_step=int(0.15 * args.steps)),
    "Adam (fp32)": lambda ps: OneBitAdam(ps, lr=args.lr, freeze_step=args.steps + 1),  # warm-up only = plain Adam
}

# ---------------------------------------------------------------------------- train
results = {}
for name, build in OPTIMIZERS.items():
    model = make_model()
    opt = build(model.parameters())
    sample = torch.Generator().manual_seed(100 + rank)
    log.info(f"\n== {name}: {sum(p.numel() for p in model.parameters()):,} params, {world} ranks")
    log.info(f"{'step':>6} {'loss':>8} {'KB sent/step':>13} {'KB sent total':>14}")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, train_x.shape[0], (args.batch,), generator=sample).to(device)
        loss = torch.nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        before = opt.comm_stats.bytes_sent
        opt.step()
        per_step = opt.comm_stats.bytes_sent - before
        if step % args.log_every == 0 or step == 1:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            log.info(
                f"{step:>6} {mean_loss.item() / world:>8.4f} {per_step / 1e3:>13.1f} {opt.comm_stats.bytes_sent / 1e3:>14.1f}"
            )
    with torch.no_grad():
        acc = (model(test_x).argmax(1) == test_y).float().mean().item()
        full_loss = torch.nn.functional.cross_entropy(model(test_x), test_y).item()
    results[name] = (full_loss, acc, opt.comm_stats.bytes_sent)

# ---------------------------------------------------------------------------- summary
adam_bytes = results["Adam (fp32)"][2]
log.info(f"\n{'optimizer':<12} {'test loss':>9} {'test acc':>9} {'MB sent':>9} {'vs Adam':>8}")
for name, (loss, acc, sent) in results.items():
    log.info(f"{name:<12} {loss:>9.4f} {acc:>9.3f} {sent / 1e6:>9.2f} {adam_bytes / sent:>7.1f}x")
dist.barrier()
dist.destroy_process_group()
