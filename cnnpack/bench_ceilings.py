"""The ceilings bench holds its rows to: each precision's measured once per machine (`cnnpack.peak`, cached) or on
the GPU each bench, measured again when a row beats one, and every row's share taken against the final ceiling of
its precision, so no row of one bench is held to two ceilings and none stands above its own unremarked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnpack.bench_outputs import series

if TYPE_CHECKING:
    from cnnpack.bench import BenchContext


def hold_to_ceilings(rows: list[dict], ceilings: dict) -> None:
    """Each row's share taken against the ceiling of its precision (fp32 where none was measured for it); with no
    ceilings at all (none measured: the GPU's kernels failed) each row keeps the matmul rate measured around it."""
    for r in rows:
        ceiling = ceilings.get(r.get("precision", "fp32")) or ceilings.get("fp32")
        if ceiling and r.get("gflops") is not None:
            r["matmul_gflops"] = ceiling["gflops"]
            r["matmul_share"] = r["gflops"] / ceiling["gflops"]


def remeasure_beaten_ceilings(ctx: BenchContext) -> None:
    """A row above its precision's ceiling means the ceiling was measured low (a slower moment of a shared host, or
    a cached one from another day): it is measured again now, once, and the higher of the two is the ceiling; the
    rows' shares are taken against it. A row still above it stays in `over_ceiling`."""
    beaten = {r["precision"] for r in ctx.results if r["matmul_share"] > 1 and r["precision"] in ctx.ceilings}
    if ctx.device.type != "cpu" or not beaten:
        return
    from cnnpack.peak import RECHECK_S, ceilings

    ctx.progress(f"the {', '.join(sorted(beaten))} ceiling again: a row beat it")
    again = ceilings(ctx.cfg.threads, precisions=beaten, seconds=RECHECK_S)
    for precision, fresh in again.items():
        old = ctx.ceilings[precision]
        if fresh["gflops"] > old["gflops"]:
            ctx.ceilings[precision] = {**fresh, "remeasured": True, "first_gflops": old["gflops"]}
            if ctx.ceilings_cache:
                from cnnpack.peak import remember_ceiling

                remember_ceiling(ctx.ceilings_cache["path"], precision, fresh)
        else:
            old["remeasured_gflops"] = fresh["gflops"]
    ctx.settle()


def measured_ceilings(ctx: BenchContext, precisions: set[str]) -> dict:
    """The measured ceiling of each precision the rows will have (fp32 always: eager and compiled are fp32)."""
    if ctx.device.type != "cpu":  # a GPU's: its cuBLAS/cuDNN kernels at sizes that fill it, each bench
        from cnnpack.peak import device_ceilings

        ctx.progress("the GPU's ceilings")
        return device_ceilings(ctx.device, precisions={"fp32", *precisions})
    from cnnpack.peak import cached_ceilings

    ctx.progress("the machine's ceilings")
    found, ctx.ceilings_cache = cached_ceilings(ctx.cfg.threads, precisions={"fp32", *precisions})
    return found


def over_ceiling(rows: list[dict]) -> list[str]:
    """The rows above the ceiling of their precision, named as the bench table names them."""
    return [f"{series(r)} b{r['batch_size']}" for r in rows if r["matmul_share"] > 1]
