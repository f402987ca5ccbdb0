"""Expert specialization: what the experts of each layer have learned to take (domains, tokens, positions),
which experts fire together, how routing of neighbouring tokens and of successive layers relates, and how
settled the router is between two checkpoints.

Every function is `f(con, sel, ...) -> pandas.DataFrame` over the public schema (`moeviz.store.schema`) and carries
`run_id` so that two runs compare side by side. Where counts suffice, the functions taking `source` read tables
~10^2-10^4 times smaller than `routes` (`source="auto"`, the default, whenever those cover the selection):

- co-activation, consecutive-token agreement and the flow between two layers: `pair_stats`, `layer_stats`'
  adjacency columns and `flow_stats`, counted by the Recorder on the device over every token of every step (not
  only the sampled ones); not for selections with domains or tags, which select tokens;
- vocabulary specialization, top tokens, NMI with the token, position shares: `token_stats` and
  `position_stats` (routes counted per token id / position, layer and expert by compaction), for selections of
  whole runs (no steps, domains or tags);
- domain shares and NMI with the domain: `sequence_stats` (routes counted per sequence), for any selection;
- router saturation: `probe_sets` (each probe token's set of experts, built by compaction), for the probe batch.

Otherwise they read the per-token detail in `routes` (joined with `sequences` for domains and tags).
`source="routes"` forces the routes; `source="aggregates"` raises a SpecializationError saying why when the tables
cannot serve. The metrics follow the papers that introduced them:

- Mixtral (Jiang et al. 2024, §5 "Routing analysis"): expert share per domain and layer; repeated assignments of
  consecutive tokens (first choice, and first-or-second choice) against their random baselines.
- OLMoE (Muennighoff et al. 2024, §5): domain and vocabulary specialization (the fraction of a domain's or a
  token's occurrences routed to an expert, the chosen experts being all k of the top-k), co-activation, and router
  saturation (overlap of the top-k sets of the same tokens at two checkpoints).

How it runs (why the SQL looks the way it does): each run is queried on its own (`run_id = ?`), so that grouping
keys are small integers, never strings. Analyses that need one row per token (co-activation, consecutive tokens,
layer flow) pack (step, rank, seq, pos) into one BIGINT from the selection's extents (`_TokenKey`), and hold the
set of a token's experts as a bitmask (`bit_or(1 << expert)`) when the layer has at most 64 experts, as a sorted
list otherwise. Every route of a token is assumed to be recorded (the collectors write all k slots of a kept
token); each token has exactly one slot-0 route per layer, so `count(*) FILTER (slot = 0)` counts tokens.
"""

from moeviz.analyses.specialization._shared import DEFAULT_POSITION_BINS, SOURCES, SpecializationError
from moeviz.analyses.specialization.coactivation import coactivation
from moeviz.analyses.specialization.consecutive import consecutive_agreement
from moeviz.analyses.specialization.domains import domain_share, domain_share_first_choice
from moeviz.analyses.specialization.flow import layer_flow
from moeviz.analyses.specialization.information import mutual_information
from moeviz.analyses.specialization.positions import position_share
from moeviz.analyses.specialization.saturation import router_saturation, saturation_curve
from moeviz.analyses.specialization.tokens import top_tokens, vocab_specialization, vocab_specialization_summary

__all__ = [
    "SpecializationError",
    "SOURCES",
    "DEFAULT_POSITION_BINS",
    "domain_share",
    "domain_share_first_choice",
    "vocab_specialization",
    "vocab_specialization_summary",
    "top_tokens",
    "position_share",
    "coactivation",
    "consecutive_agreement",
    "layer_flow",
    "router_saturation",
    "saturation_curve",
    "mutual_information",
]
