"""Simulation of the engine at cluster scale: the real scheduler against a cost model (issue 16).

    run.py           the engine's loop on a virtual clock: the real Scheduler and PagePool,
                     each iteration's duration from the cost model, fake sampled ids
    cost.py          an iteration's FLOPs, bytes and collectives (orca-jax plan's estimate,
                     read as linear coefficients) against an accelerator, with `Efficiency`
    accelerators.py  the GPU presets (sharding/plan.py's table) and `cpu-here`, measured
    calibrate.py     the real engine on this machine, timed per iteration, and the fit
    model.py         a model on a mesh and accelerator: cost and KV pages per layout
    sweep.py         systems x rates, read as `orca-jax bench` reads them; the ratio at equal latency
    paper.py         the Orca paper's Table 1 setups and §6 workload
    cli.py           `orca-jax simulate`

See docs/simulation.md.
"""
