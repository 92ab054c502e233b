"""Tensor parallelism of the engine: starting the ranks and rank 0 driving them.

``tensor_parallel_size=N`` runs N ranks over ``torch.distributed`` (NCCL on CUDA, gloo on
CPU). The engine starts ranks 1..N-1 itself (``torch.multiprocessing``, spawned), or, under
``torchrun`` (``WORLD_SIZE`` set), joins the ranks torchrun started: there rank 0 becomes the
engine and every other rank serves it until it shuts down, then exits.

Rank 0 runs the scheduler, as vLLM's driver worker does. Before each step it broadcasts the
step's plan (which sequences, the tokens they feed, their cache slots; see
:class:`~kvcompress.engine.worker.PlannedSeq`), and likewise every compression (which
sequences, their parameters) and the sequence-slot operations since the last command; every
rank then runs the same command on its own shard. The scheduler's questions about blocks are
answered for the tightest rank (the fewest free blocks, the largest need), so an admission
that fits rank 0 also fits the others. Commands go over a gloo group (beside NCCL too:
pickled objects belong on the CPU); the model's all-reduces and the compressor's all-gathers
go over the world group.

A rank that dies breaks the group: rank 0 raises :class:`WorkerFailedError` from that
command on (an engine thread stops, a server reports unhealthy). The engine's ranks never
outlive it: ``close()`` (also at interpreter exit, and when the engine fails) stops them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvcompress.cache import PagedKVCache
from kvcompress.compress import CompressionParams
from kvcompress.engine.config import EngineConfig
from kvcompress.engine.model_runner import RunnerOutput
from kvcompress.engine.outputs import KVStats, RankBlocks
from kvcompress.engine.sequence import Sequence
from kvcompress.engine.worker import PlannedSeq, Rank, RankWorker, build_rank, serve
from kvcompress.errors import WorkerFailedError
from kvcompress.models import load_config
from kvcompress.models.parallel import ShardLayout, TensorParallel, check_shardable

logger = logging.getLogger(__name__)

# Collectives of a step: every rank arrives within the step's compute of the others.
STEP_TIMEOUT = timedelta(minutes=30)
# Commands: an idle engine's ranks wait for the next one as long as it stays idle. A rank
# that dies is seen at once (its sockets close), not by this timeout.
COMMAND_TIMEOUT = timedelta(days=365)


def rank_device(device: str, local_rank: int) -> torch.device:
    """Rank ``local_rank``'s device on this node: its own GPU on CUDA."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.device("cuda", local_rank)
    return dev


def _backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _init_groups(backend: str, rank: int, size: int, init_method: str) -> Any:
    """Join the world group; returns the command group (gloo)."""
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=size, timeout=STEP_TIMEOUT
    )
    return dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)


def _run_rank(config: EngineConfig, rank: int, device: torch.device, group: Any) -> None:
    """Build this rank, tell rank 0 whether that worked, then serve its commands."""
    tp = TensorParallel(rank, config.tensor_parallel_size)
    try:
        built: Rank | None = build_rank(config, device, tp)
        error = None
    except Exception:
        built, error = None, traceback.format_exc()
    dist.all_gather_object([None] * tp.size, error, group=group)
    if built is not None:
        serve(RankWorker(built, tp, group))


def _spawned_rank(config: EngineConfig, rank: int, init_method: str, threads: int) -> None:
    """Entry point of a rank the engine started."""
    # Ctrl-C reaches the whole process group: rank 0 decides when its ranks stop (a server
    # drains its streams first), and stops them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    device = rank_device(config.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    size = config.tensor_parallel_size
    group = _init_groups(_backend(config.device), rank, size, init_method)
    try:
        _run_rank(config, rank, device, group)
    finally:
        dist.destroy_process_group()


def start_ranks(config: EngineConfig) -> tuple[Rank, RankGroup | None]:
    """This process's rank (rank 0's, with several) and the handle on the others (None on
    one device); a rank that fails to start stops them all."""
    if config.tensor_parallel_size == 1:
        return build_rank(config, torch.device(config.device)), None
    ranks = RankGroup(config)
    try:
        rank = build_rank(config, ranks.device, ranks.tp)
        ranks.ready(rank)
    except BaseException:
        ranks.close()
        raise
    return rank, ranks


class RankGroup:
    """Rank 0's handle on the others: their processes (when it started them), the command
    group, and what it sends."""

    def __init__(self, config: EngineConfig) -> None:
        self.size = size = config.tensor_parallel_size
        self.procs: list[Any] = []
        self._rendezvous: str | None = None
        self._pending: list[tuple] = []  # slot operations not yet sent
        self._lock = threading.RLock()
        self.failed: str | None = None
        self.closed = False
        if dist.is_initialized():
            raise RuntimeError(
                "this process already belongs to a torch.distributed group (another "
                "tensor-parallel engine?); close() that engine first: one per process"
            )
        # Shapes first: a size that cannot shard the model fails before any process starts.
        check_shardable(load_config(config.model), size)
        backend = _backend(config.device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # torchrun started the ranks
            if world != size:
                raise ValueError(
                    f"torchrun started {world} processes but tensor_parallel_size is {size}; "
                    f"launch with --nproc-per-node (times nodes) = {size}"
                )
            rank = int(os.environ["RANK"])
            self.device = rank_device(config.device, int(os.environ.get("LOCAL_RANK", rank)))
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.group = _init_groups(backend, rank, size, "env://")
            if rank != 0:
                # This process only serves rank 0; it ends with it.
                try:
                    _run_rank(config, rank, self.device, self.group)
                finally:
                    dist.destroy_process_group()
                sys.exit(0)
        else:
            self.device = rank_device(config.device, 0)
            self._rendezvous = tempfile.mkdtemp(prefix="kvcompress-tp-")
            init = f"file://{self._rendezvous}/rendezvous"
            # The CPU's cores shared between the ranks (rank 0's included): oversubscribed
            # OpenMP threads spin-wait on each other.
            threads = max(1, torch.get_num_threads() // size)
            if self.device.type == "cpu":
                torch.set_num_threads(threads)
            ctx = mp.get_context("spawn")
            for r in range(1, size):
                proc = ctx.Process(
                    target=_spawned_rank,
                    args=(config, r, init, threads),
                    name=f"kvcompress-tp-rank{r}",
                    daemon=True,  # never outlives this process
                )
                proc.start()
                self.procs.append(proc)
            try:
                self.group = _init_groups(backend, 0, size, init)
            except BaseException:
                self.close()
                raise
        self.tp = TensorParallel(0, size)

    # ------------------------------------------------------------- start
    def ready(self, rank: Rank) -> None:
        """Wait for every rank to be built; raise the first rank's error."""
        self.worker = RankWorker(rank, self.tp, self.group)
        try:  # the other ranks answer from _run_rank, before they serve commands
            errors = self.worker.all_gather(None)
        except Exception as err:
            self._fail(err)
            raise WorkerFailedError(self.failed) from err
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            r, error = failed[0]
            self.close()
            raise WorkerFailedError(f"tensor-parallel rank {r} failed to start:\n{error}")

    def driver_parts(self, rank: Rank) -> tuple[DriverCache, DriverCompressor, DriverRunner]:
        """The cache, compressor and runner the scheduler drives every rank through."""
        return (
            DriverCache(self, rank.cache),
            DriverCompressor(self),
            DriverRunner(self, rank.runner),
        )

    # ------------------------------------------------------------- statistics
    def reports(self, slots: list[int]) -> list[RankBlocks]:
        """Every rank's blocks (and the KVs that ``slots`` keep there)."""
        return self.call("reports", slots)

    def kv_stats(self, slot: int, compressions: int) -> KVStats:
        per_rank = self.call("kv_stats", slot, compressions)
        mc = self.worker.rank.loaded.config
        layouts = [ShardLayout.of(mc, r, self.size) for r in range(self.size)]
        return merge_kv_stats(per_rank, layouts, mc.num_kv_heads)

    def reset_peak(self) -> None:
        self.call("reset_peak")

    # ------------------------------------------------------------- commands
    def defer(self, *op: Any) -> None:
        """A slot operation rank 0 made: the others replay it before the next command."""
        self._pending.append(op)

    def call(self, name: str, *args: Any) -> Any:
        """Run a command on every rank (rank 0's result)."""
        return self.command(name, args, lambda: getattr(self.worker, name)(*args))

    def command(self, name: str, args: tuple, local: Callable[[], Any]) -> Any:
        """Broadcast a command, then run rank 0's part of it (``local``). A failure of
        either leaves the ranks out of step (some wait in a collective that will never
        come), so it ends the group: :class:`WorkerFailedError`."""
        with self._lock:
            if self.failed is None and self._dead():
                self._fail(None)
            self.check_health()
            message = [(self._pending, name, args)]
            self._pending = []
            try:
                dist.broadcast_object_list(message, 0, self.group)
                return local()
            except Exception as err:
                self._fail(err)
                raise WorkerFailedError(self.failed) from err

    def _dead(self) -> list[str]:
        return [
            f"rank {r} (exit code {p.exitcode})"
            for r, p in enumerate(self.procs, 1)
            if p.exitcode is not None
        ]

    def check_health(self) -> None:
        """Raise :class:`WorkerFailedError` if a rank is gone. Reads only (any thread): the
        group is closed by the next command."""
        if self.failed is not None:
            raise WorkerFailedError(self.failed)
        dead = self._dead()
        if dead:
            raise WorkerFailedError(self._message(f"{', '.join(dead)} died"))

    @staticmethod
    def _message(what: str) -> str:
        return f"tensor parallelism broke: {what}; the engine cannot continue, start a new one"

    def _fail(self, err: BaseException | None) -> None:
        for proc in self.procs:  # a collective broke: name the rank if it is exiting
            proc.join(timeout=1 if err is not None and not self._dead() else 0)
        dead = self._dead()
        what = f"{', '.join(dead)} died" if dead else f"a collective failed ({err})"
        self.failed = self._message(what)
        logger.error("%s", self.failed)
        self.close()

    # ------------------------------------------------------------- stop
    def close(self) -> None:
        """Stop the other ranks (politely when the group still works) and leave the group."""
        if self.closed:
            return
        self.closed = True
        # Ranks that are built and in step are asked to stop; others are killed.
        polite = self.failed is None and hasattr(self, "worker") and not self._dead()
        if polite:
            try:
                with self._lock:
                    message = [(self._pending, "shutdown", ())]
                    dist.broadcast_object_list(message, 0, self.group)
            except Exception:  # already broken: the ranks are killed below
                logger.debug("shutdown broadcast failed", exc_info=True)
                polite = False
        for proc in self.procs:
            proc.join(timeout=10 if polite else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                logger.debug("destroy_process_group failed", exc_info=True)
        if self._rendezvous is not None:
            shutil.rmtree(self._rendezvous, ignore_errors=True)


class DriverCache:
    """Rank 0's cache as the scheduler sees it under tensor parallelism: shapes and slot
    stacks are rank 0's (every rank's are the same), block counts those of the tightest rank,
    and slot operations are replayed on every rank."""

    def __init__(self, parallel: RankGroup, local: PagedKVCache) -> None:
        self.parallel = parallel
        self.local = local
        self.num_layers = local.num_layers
        self.num_kv_heads = local.num_kv_heads
        self.block_size = local.block_size
        self.config = local.config

    @property
    def seq_lens(self) -> torch.Tensor:
        return self.local.seq_lens

    @property
    def num_free_seq_slots(self) -> int:
        return self.local.num_free_seq_slots

    def blocks_for(self, num_tokens: int) -> int:
        return self.local.blocks_for(num_tokens)

    @property
    def num_free_blocks(self) -> int:
        return self.parallel.call("free_blocks")

    def blocks_needed(self, seq_slots: torch.Tensor, num_tokens: torch.Tensor) -> int:
        return self.parallel.call("blocks_needed", seq_slots.cpu(), num_tokens.cpu())

    def allocate_seq(self) -> int:
        slot = self.local.allocate_seq()
        self.parallel.defer("allocate_seq", slot)
        return slot

    def fork_seq(self, src: int) -> int:
        slot = self.local.fork_seq(src)
        self.parallel.defer("fork_seq", src, slot)
        return slot

    def free_seq(self, slot: int) -> None:
        self.local.free_seq(slot)
        self.parallel.defer("free_seq", slot)


class DriverCompressor:
    """Every compression runs on every rank at once (their chunk scores are exchanged)."""

    def __init__(self, parallel: RankGroup) -> None:
        self.parallel = parallel

    def compress(
        self, seq_slots: list[int], params: list[CompressionParams], inputs: Any = None
    ) -> Any:
        # ``inputs``' kept queries (rank 0's) stay here: each rank reads its own. The spans
        # are the tokens', the same on every rank.
        spans = None if inputs is None or inputs.spans is None else inputs.spans.cpu()
        return self.parallel.call("compress", list(seq_slots), list(params), spans)


class DriverRunner:
    """Broadcasts the step's plan, then runs rank 0's part (which alone computes logits)."""

    def __init__(self, parallel: RankGroup, local: Any) -> None:
        self.parallel = parallel
        self.local = local
        self.model = local.model
        self.kept_queries = local.kept_queries  # rank 0's: the scheduler copies them for forks
        self.token_spans = local.token_spans

    def run(
        self,
        seqs: list[Sequence],
        num_tokens: list[int],
        num_decode: int,
        sample: list[int],
        prompt_logprobs: Any = None,
    ) -> RunnerOutput:
        plan = []
        for i, (s, n) in enumerate(zip(seqs, num_tokens, strict=True)):
            # What the runner feeds: a decode's last token, a chunk's next n tokens (and
            # the tokens before them, when it reads their spans).
            start = s.num_computed
            if i < num_decode:
                first, fed = start, [s.last_token]
            else:
                first = 0 if self.local.pools_spans(s) else start
                fed = s.token_slice(first, start + n)
            plan.append(
                PlannedSeq(
                    s.slot,
                    start,
                    fed,
                    first,
                    s.compression,
                    s.collects_metric,
                    s.keeps_last_query,
                    s.keeps_window_queries,
                )
            )
        return self.parallel.command(
            "execute",
            (plan, num_tokens, num_decode),
            lambda: self.local.run(seqs, num_tokens, num_decode, sample, prompt_logprobs),
        )


def merge_kv_stats(
    per_rank: list[KVStats], layouts: list[ShardLayout], num_kv_heads: int
) -> KVStats:
    """One request's KV statistics over every rank: kept KVs per (layer, KV head) of the
    whole model (a replicated head once), blocks as held (replicas too: they are memory)."""
    num_layers = len(per_rank[0].kept_per_layer_head)
    grid = [[0] * num_kv_heads for _ in range(num_layers)]
    seen_heads: set[int] = set()
    for stats, layout in zip(per_rank, layouts, strict=True):
        for j, head in enumerate(layout.kv_heads):
            if head in seen_heads:
                continue
            seen_heads.add(head)
            for layer in range(num_layers):
                grid[layer][head] = stats.kept_per_layer_head[layer][j]
    kept = sum(map(sum, grid))
    seen = per_rank[0].kvs_seen // len(layouts[0].kv_heads) * num_kv_heads
    physical = sum(s.physical_kvs for s in per_rank)
    return per_rank[0]._replace(
        kvs_seen=seen,
        kvs_kept=kept,
        physical_kvs=physical,
        blocks=sum(s.blocks for s in per_rank),
        compression_rate=seen / kept if kept else 1.0,
        physical_over_theoretical=physical / kept if kept else 1.0,
        kept_per_layer_head=grid,
        blocks_shared=sum(s.blocks_shared for s in per_rank),
    )
