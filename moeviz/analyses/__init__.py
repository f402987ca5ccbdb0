"""The analyses: pure functions `f(con, sel, ...) -> pandas.DataFrame` over a store's public tables.

Each answers one question and reads the smallest table that can answer it (the exact per-step aggregates, the
compaction's counts, else the per-token routes). They import the store's readers, never the app or the CLI.

    load               expert load, the load matrix, imbalance
    aux_loss           the Switch auxiliary loss per layer and pooled, the router z-loss
    capacity           tokens a capacity factor would drop, and the drop curve over factors
    probability_drops  capacity's probability policy per assignment, in one pass over the compacted routes
    specialization/    what the experts take: domains, tokens, positions, co-activation, consecutive tokens,
                       layer flow, router saturation, mutual information (a module per question)
    balancing          the selection bias of aux-loss-free balancing over time, MaxVio both ways
    placement          expert parallelism: load per GPU under a placement, balanced placements with replicas,
                       dispatch traffic between GPUs, how fast a fitted placement goes stale
    health             the checks `moeviz check` and the Overview run: dead or collapsed experts, imbalance, drops
    bounds             the true lower bound of the Switch auxiliary loss (no store)
    toy                the toy MoE of the reference explainers (no store)
"""
