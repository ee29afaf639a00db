"""Peer for `knn-diffusion bench allreduce`: torch.distributed all_reduce (average) of one
float32 buffer over `--world` processes on this machine, gloo on the CPU or NCCL on GPUs.
Prints one JSON line: {"seconds_per_op": ..., "backend": ...}."""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, args, port, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    backend = args.backend
    dist.init_process_group(backend, rank=rank, world_size=args.world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    n = args.mib * 1024 * 1024 // 4
    t = torch.ones(n, dtype=torch.float32, device=device)
    for _ in range(args.warmup):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(args.world)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.rounds):
        # gloo has no AVG: sum then divide, as DDP does.
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(args.world)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if rank == 0:
        out.put(elapsed / args.rounds)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--port", type=int, default=29611)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, args.port, q)) for r in range(args.world)]
    for pr in procs:
        pr.start()
    secs = q.get(timeout=600)
    for pr in procs:
        pr.join()
    print(json.dumps({"seconds_per_op": secs, "backend": args.backend, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
