"""Several engine replicas behind a global scheduler, on Ray Serve (docs/replicas.md).

    routing.py   the choice: replicas' reports and a prompt's page keys in, one replica out
                 (pure; prefix affinity, least load, round-robin, power-of-two)
    router.py    that choice as Ray Serve's request router (OrcaRequestRouter)
    replica.py   one engine + its server as a Serve deployment (EngineReplica)
    ingress.py   the OpenAI-compatible HTTP ingress: relays, retries once, /health, /metrics
    metrics.py   per-replica and aggregated vllm:* series for the ingress's /metrics
    app.py       the application: `build(ReplicasConfig)`, `build_app` for `serve run`
    cli.py       `orca-jax serve --replicas N`

`serve run orca_jax.ray:app` serves 2 replicas of the demo model;
`serve run orca_jax.ray:build_app model=DIR replicas=4 ...` anything else. Only `routing` and
`metrics` import without Ray (`pip install orca-jax[ray]`): `app` is built on first access.
"""


def __getattr__(name: str):
    if name == "app":  # `serve run orca_jax.ray:app`: built when asked for, not on import
        from .app import build_app
        return build_app({})
    if name == "build_app":
        from .app import build_app
        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
