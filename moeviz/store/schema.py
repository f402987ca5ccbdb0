"""The public SQL schema of a moeviz store: table names, columns, types and meanings.

These names are a contract with users (their SQL, their notebooks, Spark jobs reading the Parquet segments):
add columns at the end, never rename or drop one without a schema-version bump and a migration step in
`moeviz.store`. The README's schema section is generated from this module (`moeviz schema --markdown`).

Storage notes (why some columns differ on disk from what SQL sees):
- `routes.weight` is stored on disk as `weight_q` UINT16 = round(weight * 65535) (absolute error <= 7.7e-6) so
  that one route costs at most ~4 bytes in Parquet; the `routes` view exposes `weight` as DOUBLE.
- every segment carries `run_id` as a constant column (dictionary/RLE-encoded: a few bytes per file), so that a
  folder of runs is one `read_parquet` glob with no path parsing.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 5


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str  # DuckDB type as seen through the public view
    doc: str


@dataclass(frozen=True)
class Table:
    name: str
    doc: str
    columns: tuple[Column, ...]

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


def _t(name: str, doc: str, *cols: tuple[str, str, str]) -> Table:
    return Table(name, doc, tuple(Column(*c) for c in cols))


RUNS = _t(
    "runs",
    "One row per run: the model and how it was recorded. `status` is derived at read time: "
    "'running' while a writer is alive, 'finished' or 'failed' once every rank closed, "
    "'interrupted' when a writer died without closing (kill -9, OOM, node loss), 'damaged' when the run's "
    "run.duckdb cannot be opened (its compacted data is then missing; `error` says what to do). A recording that "
    "lost data while training went on keeps its status (training finished): `recording_errors` says so.",
    ("run_id", "VARCHAR", "Unique id of the run (the run folder's name unless given)."),
    ("run_name", "VARCHAR", "Human name given to the Recorder."),
    ("model_class", "VARCHAR", "Python class of the recorded model, e.g. MixtralForCausalLM."),
    ("n_layers", "INTEGER", "Number of MoE layers recorded (routers found)."),
    ("n_experts", "INTEGER", "Experts per MoE layer (the largest, if layers differ; see `layers`)."),
    ("top_k", "INTEGER", "Experts chosen per token (the largest, if layers differ; see `layers`)."),
    ("capacity_factor", "DOUBLE", "The model's own capacity factor if it drops tokens, else NULL (Switch: "
     "expert_capacity * n_experts / sequence length of the first recorded step's first stack, the encoder's; "
     "`layers.capacity_factor` and `layers.expert_capacity` hold each layer's own)."),
    ("config", "JSON", "The model config (HF `config.to_dict()` or the user's dict)."),
    ("world_size", "INTEGER", "Number of ranks that wrote to the run."),
    ("sample_every", "INTEGER", "Per-token detail kept every N steps (1 = every step)."),
    ("max_tokens_per_step", "INTEGER", "Per-token detail kept for at most M tokens per step and rank (NULL = all)."),
    ("started_at", "TIMESTAMP", "When the first rank started recording (UTC)."),
    ("ended_at", "TIMESTAMP", "When the last rank closed (UTC); NULL while running or if interrupted."),
    ("status", "VARCHAR", "running | finished | failed | interrupted | damaged."),
    ("error", "VARCHAR", "The exception that failed the run, if any."),
    ("schema_version", "INTEGER", "Schema version the run was written with."),
    ("route_stats_complete", "BOOLEAN", "`token_stats`, `position_stats` and `sequence_stats` hold every route of the run (it was "
     "compacted and no routes were written since); while false the analyses read `routes`."),
    ("recording_errors", "BIGINT", "Recording failures of the run (a flush that could not be written, a disk full, a step "
     "whose aggregates could not be computed): training went on without them, so the run is degraded when this is "
     "above 0: `recording_error` says what was lost. 0 for a complete recording; NULL for runs written before it "
     "existed. Kept per rank in the status files; this column shows rank 0's (or the lowest rank's) count."),
    ("recording_error", "VARCHAR", "The first recording failure and what it lost (e.g. 'the flush of steps 4-9 was "
     "not written: OSError: No space left on device'); NULL when there was none."),
)

LAYERS = _t(
    "layers",
    "One row per recorded MoE layer (router) of a run.",
    ("run_id", "VARCHAR", "Run id."),
    ("layer", "INTEGER", "MoE layer index, 0-based in module order (dense layers are skipped)."),
    ("module_name", "VARCHAR", "Qualified module name of the router, e.g. model.layers.3.mlp.gate."),
    ("n_experts", "INTEGER", "Experts in this layer."),
    ("top_k", "INTEGER", "Experts chosen per token in this layer."),
    ("block_index", "INTEGER", "Index of the transformer block holding this layer (NULL if unknown)."),
    ("stack", "VARCHAR", "'decoder', 'encoder' (Switch/T5-style models) or NULL."),
    ("capacity_factor", "DOUBLE", "This layer's own capacity factor when its router drops tokens past a capacity that "
     "scales with the group (Megatron-Core, DeepSpeed): C = ceil(factor * tokens * k / E); NULL for a fixed capacity "
     "(see `expert_capacity`), for dropless routers, and for data written before it existed."),
    ("expert_capacity", "INTEGER", "Slots per expert and sequence of a fixed-capacity router (Switch Transformers' "
     "`expert_capacity`): the same for the encoder and the decoder whatever their lengths, so each stack's drops "
     "follow from it; NULL otherwise."),
)

ROUTES = _t(
    "routes",
    "Per-token detail: one row per kept token, MoE layer and chosen expert. Tokens outside the attention "
    "mask are never recorded. Which tokens are kept is set by the sampling policy (runs.sample_every, "
    "runs.max_tokens_per_step).",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Training/eval step given to Recorder.step()."),
    ("rank", "INTEGER", "torch.distributed rank that recorded the token (0 if not distributed)."),
    ("seq", "INTEGER", "Sequence index within the step and rank (row of the batch)."),
    ("pos", "INTEGER", "Token position within the sequence."),
    ("token_id", "INTEGER", "Vocabulary id of the token (NULL-free; -1 if no token ids were given)."),
    ("layer", "SMALLINT", "MoE layer index (see `layers`)."),
    ("slot", "TINYINT", "Rank of the choice: 0 is the top expert, k-1 the last chosen."),
    ("expert", "SMALLINT", "Chosen expert index."),
    ("weight", "DOUBLE", "Gate weight the model applied to this expert (after any renormalisation), before a routed "
     "scaling factor (DeepSeek/GLM `routed_scaling_factor`, in runs.config). NULL where the source has no gate "
     "weights (runs imported from serving or training engine logs): never a made-up value."),
    ("dropped", "BOOLEAN", "True where the model itself dropped this assignment (capacity: Switch, DeepSpeed, Megatron "
     "with a capacity factor), so the expert never processed the token; false where it was processed; NULL where "
     "the source does not say (engine logs, data written before it existed)."),
    ("margin", "DOUBLE", "How close the router's call was for this token and layer: for a softmax router the full "
     "softmax probability of the last chosen expert minus that of the best unchosen one (before any "
     "renormalisation), for a biased sigmoid router (DeepSeek-V3) the same in the score-plus-bias space it chose "
     "on; the same on every slot row of the token and layer. Stored as float32 (the Recorder writes it in steps of "
     "2^-16, the gate weight's resolution). NULL where unknown (engine logs, a router whose scores were not seen, "
     "data written before it existed)."),
)

STEP_STATS = _t(
    "step_stats",
    "Exact per-step aggregates over every token that reached the layer (not only the sampled ones) with finite "
    "router outputs (`layer_stats.nonfinite_tokens` counts the others): one row per step, rank, layer and expert. "
    "A step number given to Recorder.step() twice is one step here: its rows add up both calls.",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Step."),
    ("rank", "INTEGER", "Rank."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("expert", "SMALLINT", "Expert index."),
    ("tokens", "BIGINT", "Tokens that reached the layer in this step and rank (same for every expert); NULL where "
     "the source does not count tokens (e.g. SGLang's expert-count dumps)."),
    ("assigned", "BIGINT", "Top-k assignments of tokens to this expert (over all k slots)."),
    ("first_choice", "BIGINT", "Tokens whose top (slot 0) choice is this expert; NULL where the source has no slot "
     "order (engine logs whose ids are in kernel or ascending order)."),
    ("prob_sum", "DOUBLE", "Sum over tokens of softmax(router_logits)[expert] (full float32 softmax, before top-k), "
     "for every family; for sigmoid routers (DeepSeek-V3) this is not the score the model chose on. NULL where "
     "the source has no router probabilities (engine logs)."),
    ("dropped", "BIGINT", "Assignments to this expert that the model itself dropped (capacity), else 0; NULL where "
     "the source cannot say (a Megatron-LM routing trace is taken before the capacity drop)."),
)

LAYER_STATS = _t(
    "layer_stats",
    "Exact per-step aggregates per layer: one row per step, rank and layer.",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Step."),
    ("rank", "INTEGER", "Rank."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("tokens", "BIGINT", "Tokens that reached the layer with finite router outputs (see `nonfinite_tokens`); NULL "
     "where the source does not count tokens (SGLang's expert-count dumps)."),
    ("z_loss_sum", "DOUBLE", "Sum over tokens of logsumexp(router_logits)^2 (ST-MoE router z-loss numerator); "
     "tokens with non-finite router outputs are left out. NULL where the source has no router logits (engine logs)."),
    ("entropy_sum", "DOUBLE", "Sum over tokens of the entropy (nats) of softmax(router_logits); tokens with "
     "non-finite router outputs are left out. NULL where the source has no router logits (engine logs)."),
    ("dropped", "BIGINT", "Assignments the model itself dropped in this layer (capacity), else 0; NULL where the "
     "source cannot say (see `step_stats.dropped`)."),
    ("adjacent_pairs", "BIGINT", "Pairs of consecutive tokens (pos and pos+1 of one sequence, both inside the "
     "attention mask). This and the next three columns are NULL when the recorder did not know the token layout "
     "or predates them: the analyses then read `routes`."),
    ("same_first", "BIGINT", "Adjacent pairs whose first (slot 0) choices are the same expert."),
    ("first_in_topk", "BIGINT", "Adjacent pairs where the first choice of token pos+1 is among the k experts of "
     "token pos."),
    ("topk_overlap", "BIGINT", "Adjacent pairs whose k-sets of experts share at least one expert."),
    ("coactive_pairs", "BIGINT", "Pairs of experts chosen together, summed over tokens (tokens * k(k-1)/2): equals "
     "sum(pair_stats.tokens) of this step, rank and layer; NULL when `pair_stats` was not recorded."),
    ("nonfinite_tokens", "BIGINT", "Tokens inside the attention mask whose router logits or gate weights were NaN or "
     "infinite (an expert masked with -inf logits is fine, all of them -inf is not). They are left out of every other "
     "column of this row and of `step_stats`, `pair_stats`, `flow_stats` and `routes` (their softmax, z-loss and "
     "entropy are NaN and their top-k choice is arbitrary), so tokens + nonfinite_tokens tokens reached the layer. "
     "`moeviz check` flags them (check `nonfinite_router`). NULL for data written before it existed."),
    ("ranks_summed", "INTEGER", "How many ranks' aggregates this row and its step's `step_stats`, `pair_stats` and "
     "`flow_stats` rows sum: `Recorder(reduce_ranks=...)` (on by default past 8 ranks) sums a data-parallel group's "
     "step aggregates at each flush and its first rank writes them, so `rank` is that rank's, not the only one "
     "that routed. NULL: the writing rank's own counts. Analyses that need one rank's counts (capacity drops per "
     "rank and step) refuse such steps."),
)

PAIR_STATS = _t(
    "pair_stats",
    "Exact per-step co-activation counts over every token that reached the layer: one row per step, rank, layer "
    "and pair of experts chosen together by at least one token (pairs with no token are left out).",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Step."),
    ("rank", "INTEGER", "Rank."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("expert_i", "SMALLINT", "The lower expert index of the pair."),
    ("expert_j", "SMALLINT", "The higher expert index of the pair (expert_i < expert_j)."),
    ("tokens", "BIGINT", "Tokens whose k chosen experts include both expert_i and expert_j."),
)

FLOW_STATS = _t(
    "flow_stats",
    "Exact per-step flow of tokens between the experts of two MoE layers, over every token that reached both: "
    "one row per step, rank, pair of layers and pair of experts with at least one token. The Recorder counts "
    "each layer and the next by default (`Recorder(flow_stats='all')`: every pair of layers).",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Step."),
    ("rank", "INTEGER", "Rank."),
    ("layer_a", "SMALLINT", "The MoE layer the tokens leave."),
    ("layer_b", "SMALLINT", "A later MoE layer the same tokens reach (layer_a + 1 by default)."),
    ("expert_a", "SMALLINT", "Expert of layer_a."),
    ("expert_b", "SMALLINT", "Expert of layer_b."),
    ("first_tokens", "BIGINT", "Tokens whose first (slot 0) choice is expert_a in layer_a and expert_b in layer_b."),
    ("topk_pairs", "BIGINT", "Tokens having expert_a among their k experts in layer_a and expert_b among their k "
     "in layer_b, summed over tokens (a token adds k_a * k_b over all cells)."),
)

SEQUENCES = _t(
    "sequences",
    "One row per recorded sequence (batch row) per step and rank.",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Step."),
    ("rank", "INTEGER", "Rank."),
    ("seq", "INTEGER", "Sequence index within the step and rank."),
    ("domain", "VARCHAR", "Domain label (e.g. code, prose, it, math) or NULL."),
    ("tag", "VARCHAR", "What the step was: 'train', 'eval', 'probe' (fixed batch for router saturation), ..."),
    ("n_tokens", "INTEGER", "Tokens of the sequence inside the attention mask."),
    ("seq_key", "UBIGINT", "The sequence's identity across runs: a 64-bit hash of its token ids inside the attention "
     "mask, in position order (`moeviz.store.sequence_key`: BLAKE2b with an 8-byte digest of the ids as little-endian "
     "int64, read as a little-endian unsigned integer), so that the same tokens recorded by another run (another "
     "checkpoint, dtype or batch) join on (seq_key, pos). NULL when the token ids were not known (embeddings "
     "given) and for data written before it existed."),
    ("sample_id", "VARCHAR", "The user's key for the sequence (`Recorder.step(..., sample_ids=[...])`: a request or "
     "dataset id), or NULL. Where both sides have one, `moeviz.agreement` matches sequences by it instead of "
     "`seq_key`."),
    ("pos_offset", "INTEGER", "The batch column (`routes.pos`) of the sequence's first token inside the attention "
     "mask: 0 for right padding or none, the padding's width for left padding, so that `pos - pos_offset` is the "
     "token's position within the sequence (what `moeviz.agreement` matches on). NULL where the token ids were "
     "not known and for data written before it existed (read as 0)."),
    ("prompt_tokens", "INTEGER", "How many of the sequence's tokens were the prompt: tokens at `pos - pos_offset >= "
     "prompt_tokens` were generated (decode steps of `generate()`, an engine's completion). NULL where unknown "
     "(training batches, data written before it existed). For an encoder-decoder model, the decoder's prompt "
     "(its start token): its encoder tokens are all input."),
)

EXPERT_BIAS = _t(
    "expert_bias",
    "The selection bias of routers that add one to the scores before top-k (aux-loss-free balancing: DeepSeek-V2/V3 "
    "`e_score_correction_bias`, torchtitan and Megatron-Core `expert_bias`), read at each recorded step: one row "
    "per step, rank, layer and expert. Empty for routers without a bias.",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Step."),
    ("rank", "INTEGER", "Rank."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("expert", "SMALLINT", "Expert index."),
    ("bias", "DOUBLE", "The bias added to this expert's score for the choice (not to its gate weight), as the model "
     "held it during the step."),
)

BALANCE_STATS = _t(
    "balance_stats",
    "The load-balancing losses the model families compute per sequence (batch row), summed over the sequences of "
    "a step on the device: one row per step, rank and layer. A loss's value is its sum over the sequences "
    "divided by `sequences` (`moeviz.analyses.aux_loss.sequence_balance_loss`). Tokens outside the attention "
    "mask or with non-finite router outputs are left out (transformers' Switch Transformers counts padding too). "
    "Empty for data written before it existed and for layers whose token layout was unknown.",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Step."),
    ("rank", "INTEGER", "Rank."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("sequences", "BIGINT", "Sequences of this step and rank with at least one token counted in this layer."),
    ("switch_sum", "DOUBLE", "Sum over sequences of Switch Transformers' load-balancing loss of the sequence "
     "(transformers' switch_transformers `load_balancing_loss_func` on one batch row): E * sum_i f_i P_i with f_i "
     "the share of the sequence's tokens that chose expert i (in any of the k slots) and P_i their mean softmax "
     "probability of i; uniform routing gives k (1 for Switch's top-1)."),
    ("switch_stack_sum", "DOUBLE", "The same sum with f and P pooled over this layer and every earlier MoE layer "
     "of its stack (the same tokens), as transformers concatenates a stack's router logits: at a stack's last "
     "layer it is the model's `encoder_aux_loss` / `decoder_aux_loss` times `sequences`."),
    ("seq_aux_sum", "DOUBLE", "Sum over sequences of DeepSeek-V3's complementary sequence-wise balance loss without "
     "its factor alpha: sum_i f_i P_i with f_i = E / (k T) * (tokens of the sequence that chose i) and P_i the "
     "mean over its T tokens of the normalised sigmoid affinity sigmoid(logit_i) / sum_j sigmoid(logit_j); uniform "
     "routing gives 1."),
)

VOCAB = _t(
    "vocab",
    "Token texts, when a tokenizer was given to the Recorder.",
    ("run_id", "VARCHAR", "Run id."),
    ("token_id", "INTEGER", "Vocabulary id."),
    ("text", "VARCHAR", "Decoded text of the token."),
)

TOKEN_STATS = _t(
    "token_stats",
    "Routes counted per token id, layer and expert over all steps: built from `routes` when a run is compacted "
    "(so it holds the sampled tokens, like `routes`), for the vocabulary analyses over a whole run.",
    ("run_id", "VARCHAR", "Run id."),
    ("rank", "INTEGER", "Rank."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("token_id", "INTEGER", "Vocabulary id of the token (-1: no token ids were given)."),
    ("expert", "SMALLINT", "Chosen expert index."),
    ("assigned", "BIGINT", "Routes of this token id to this expert (over all k slots)."),
    ("first_choice", "BIGINT", "Of those, routes in slot 0 (the token's top choice)."),
)

POSITION_STATS = _t(
    "position_stats",
    "Routes counted per position, layer and expert over all steps: built from `routes` when a run is compacted, "
    "for the position analyses over a whole run.",
    ("run_id", "VARCHAR", "Run id."),
    ("rank", "INTEGER", "Rank."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("pos", "INTEGER", "Token position within the sequence."),
    ("expert", "SMALLINT", "Chosen expert index."),
    ("assigned", "BIGINT", "Routes of tokens at this position to this expert (over all k slots)."),
    ("first_choice", "BIGINT", "Of those, routes in slot 0."),
)

SEQUENCE_STATS = _t(
    "sequence_stats",
    "Routes counted per sequence, layer and expert: built from `routes` when a run is compacted, for the "
    "analyses by domain and tag (join `sequences` on run_id, step, rank, seq).",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Step."),
    ("rank", "INTEGER", "Rank."),
    ("seq", "INTEGER", "Sequence index within the step and rank."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("expert", "SMALLINT", "Chosen expert index."),
    ("assigned", "BIGINT", "Routes of this sequence's tokens to this expert (over all k slots)."),
    ("first_choice", "BIGINT", "Of those, routes in slot 0."),
)

PROBE_SETS = _t(
    "probe_sets",
    "The experts each token of a probe step chose: one row per token and layer of the sequences tagged 'probe', "
    "built from `routes` when a run is compacted, for router saturation (the same tokens at two checkpoints) "
    "without reading routes.",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Step."),
    ("rank", "INTEGER", "Rank."),
    ("seq", "INTEGER", "Sequence index within the step and rank."),
    ("pos", "INTEGER", "Position within the sequence."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("token_id", "INTEGER", "Vocabulary id of the token."),
    ("first_expert", "SMALLINT", "The token's first (slot 0) choice."),
    ("experts", "UBIGINT", "The token's chosen experts as a bitmask (bit e set for expert e); NULL when the layer "
     "has more than 64 experts (the analyses then read `routes`)."),
)

TOKEN_SETS = _t(
    "token_sets",
    "The experts each kept token chose, one row per token and layer: built from `routes` when a run is compacted, "
    "so that routing agreement (`moeviz.agreement`, `moeviz agree`) joins one row per token and layer of each side "
    "instead of grouping k routes per token at query time (80 M routes per side: 20 s -> about 3 s, docs/benchmarks.md). A live run's "
    "new routes are not in it until the next compaction (the analyses then read `routes`).",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Step."),
    ("rank", "INTEGER", "Rank."),
    ("seq", "INTEGER", "Sequence index within the step and rank."),
    ("pos", "INTEGER", "Token position within the batch row (as `routes.pos`)."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("token_id", "INTEGER", "Vocabulary id of the token."),
    ("first_expert", "SMALLINT", "The token's first (slot 0) choice."),
    ("experts", "UBIGINT", "The token's chosen experts as a bitmask (bit e set for expert e); NULL when an expert "
     "index is outside 0-63 (the analyses then read `routes`)."),
    ("k", "TINYINT", "Routes of the token in this layer (its k; more than the bits of `experts` when an expert "
     "was chosen twice)."),
    ("margin", "DOUBLE", "`routes.margin` of the token and layer (how close the call was), NULL where unknown."),
)

WEIGHT_HIST = _t(
    "weight_hist",
    "Each expert's gate weights per step, counted in 256 bins: built from `routes` when a run is compacted, so "
    "that the probability capacity policy (highest weights kept) finds each expert's cut-off bin without ranking "
    "every route. An expert with at most 64 routes in a step and rank (`WEIGHT_HIST_MERGE_MAX`) has one merged row "
    "instead, `bin` = -1 and `above` = 0, standing for all its routes (schema version 5; a version 4 run's rows "
    "are all bins); its weights are then not binned: read them from `routes`.",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Step."),
    ("rank", "INTEGER", "Rank."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("expert", "SMALLINT", "Chosen expert index."),
    ("bin", "SMALLINT", "Weight bin: `routes.weight_q >> 8` (0-255; bin b holds weights in [b/256, (b+1)/256) "
     "of WEIGHT_SCALE), or -1: every route of the step, rank, layer and expert (a merged row)."),
    ("assigned", "BIGINT", "Routes of this step, rank, layer and expert whose weight falls in the bin."),
    ("first_choice", "BIGINT", "Of those, routes in slot 0."),
    ("weight_q_sum", "BIGINT", "Sum of their `weight_q` (divide by 65535 for gate weight)."),
    ("above", "BIGINT", "Routes of the same step, rank, layer and expert in higher bins (0 in a merged row)."),
)

STEP_ROLLUPS = _t(
    "step_rollups",
    "`step_stats` summed over ranks and over blocks of 10, 100 and 1,000 steps (`resolution`): one row per run, "
    "resolution, block, layer and expert with any recorded row (two while a block has both compacted rows and "
    "rows still in segments: sum them). Derived, never written by a Recorder: compaction "
    "builds it into run.duckdb and the reader adds the not-yet-compacted segments on the fly, so it always sums "
    "every step_stats row of the run. Curves over a long run (step buckets that are multiples of a resolution) "
    "and totals over many steps read it instead of every step: sums are exact, so the answers are the same. Not "
    "split by rank: the analyses read `step_stats` when a selection picks ranks.",
    ("run_id", "VARCHAR", "Run id."),
    ("resolution", "INTEGER", "Steps per block: 10, 100 or 1000."),
    ("step", "BIGINT", "The block's first step (a multiple of resolution); the block spans steps "
     "[step, step + resolution - 1]."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("expert", "SMALLINT", "Expert index."),
    ("tokens", "BIGINT", "sum(step_stats.tokens) over the block's steps and every rank."),
    ("assigned", "BIGINT", "sum(step_stats.assigned) over the block's steps and every rank."),
    ("first_choice", "BIGINT", "sum(step_stats.first_choice) over the block's steps and every rank."),
    ("prob_sum", "DOUBLE", "sum(step_stats.prob_sum) over the block's steps and every rank."),
    ("dropped", "BIGINT", "sum(step_stats.dropped) over the block's steps and every rank."),
)

LAYER_ROLLUPS = _t(
    "layer_rollups",
    "`layer_stats` summed over ranks and over blocks of 10, 100 and 1,000 steps, like `step_rollups`: one row per "
    "run, resolution, block and layer. Derived (compaction, plus the live segments on the fly).",
    ("run_id", "VARCHAR", "Run id."),
    ("resolution", "INTEGER", "Steps per block: 10, 100 or 1000."),
    ("step", "BIGINT", "The block's first step (a multiple of resolution)."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("tokens", "BIGINT", "sum(layer_stats.tokens) over the block's steps and every rank."),
    ("z_loss_sum", "DOUBLE", "sum(layer_stats.z_loss_sum) over the block's steps and every rank."),
    ("entropy_sum", "DOUBLE", "sum(layer_stats.entropy_sum) over the block's steps and every rank."),
    ("dropped", "BIGINT", "sum(layer_stats.dropped) over the block's steps and every rank."),
    ("nonfinite_tokens", "BIGINT", "sum(layer_stats.nonfinite_tokens) over the block's steps and every rank "
     "(rows written before the column existed count 0)."),
)

LAYER_BUCKETS = _t(
    "layer_buckets",
    "Per block of steps and layer, the statistics of the block's per-expert load that sums over blocks cannot "
    "give (the busiest expert, the sum of squares, Switch's sum of products): one row per run, resolution "
    "(1, 2, 5, 10, 20, 50, ... steps: every step bucket the pages draw), block and layer, computed at compaction "
    "from `step_stats` summed over ranks and over the block's steps. A curve over steps of a wide model reads "
    "one row per bucket and layer instead of E. Derived, in run.duckdb only; the analyses read `step_stats` "
    "where a store lacks it (compacted before it existed, or live).",
    ("run_id", "VARCHAR", "Run id."),
    ("resolution", "INTEGER", "Steps per block."),
    ("step", "BIGINT", "The block's first step (a multiple of resolution)."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("n_experts", "INTEGER", "Experts of the layer (`layers`, else `runs`)."),
    ("top_k", "INTEGER", "k of the layer."),
    ("experts_seen", "INTEGER", "Experts with a step_stats row in the block."),
    ("tokens", "BIGINT", "Tokens that reached the layer in the block (every rank)."),
    ("assigned", "BIGINT", "Assignments of the layer in the block (all k slots)."),
    ("first_choice", "BIGINT", "Slot-0 assignments of the layer in the block (NULL where unknown)."),
    ("assigned_max", "BIGINT", "The busiest expert's assignments in the block (MaxVio's max)."),
    ("assigned_sq", "DOUBLE", "Sum over experts of the squared block load (the coefficient of variation)."),
    ("assigned_xlogx", "DOUBLE", "Sum over experts of n ln n of the block load (the load's entropy)."),
    ("topk_sum", "BIGINT", "Assignments of the layer's k busiest experts in the block (top-k coverage)."),
    ("dead_experts", "INTEGER", "Experts whose share of the block's load is below 0.1 of the uniform share "
     "(`imbalance`'s default dead_threshold; 0 when the block has no assignment)."),
    ("prob_dot", "DOUBLE", "Sum over experts of assigned x prob_sum of the block (the Switch loss' numerator); NULL "
     "where the router probabilities are unknown."),
)

POOLED_BUCKETS = _t(
    "pooled_buckets",
    "Per block of steps, transformers' pooled Switch numerator over every layer: sum over experts of (assigned "
    "summed over layers) x (prob_sum summed over layers). Resolutions and blocks as `layer_buckets`.",
    ("run_id", "VARCHAR", "Run id."),
    ("resolution", "INTEGER", "Steps per block."),
    ("step", "BIGINT", "The block's first step."),
    ("prob_dot", "DOUBLE", "Sum over experts of (sum over layers of assigned) x (sum over layers of prob_sum)."),
)

STEP_DROPS = _t(
    "step_drops",
    "Capacity drops per step and layer at a few capacity factors (0.5, 0.75, 1, 1.25, 1.5, 2, 3), computed at "
    "compaction from `step_stats` as `capacity_drops(group='step')` does: per rank's row, max(0, n - C) with "
    "C = ceil(CF x tokens x k / E), summed over the step's ranks and experts. A drop needs each step's "
    "per-expert count, so no sum of counts can give it: this is what the health check and the Capacity page's "
    "per-layer drops and drop-rate curve read instead of every step_stats row.",
    ("run_id", "VARCHAR", "Run id."),
    ("step", "BIGINT", "Step."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("capacity_factor", "DOUBLE", "The capacity factor."),
    ("assigned", "BIGINT", "Assignments (experts with at least one)."),
    ("dropped", "BIGINT", "Assignments beyond capacity; NULL where the token counts are unknown."),
)

EXPERT_DROPS = _t(
    "expert_drops",
    "Capacity drops per block of 100 or 1,000 steps, layer and expert at the factors of `step_drops`, computed at "
    "compaction from `step_stats` the same way (each rank's row of a step is one group: max(0, n - C) with "
    "C = ceil(CF x tokens x k / E)), summed over the block's steps and ranks. What the Capacity page's per-expert "
    "heat map reads instead of every step_stats row (14,848 a step and rank for 58 layers x 256 experts); the "
    "steps of a range that fill no whole block are read from step_stats.",
    ("run_id", "VARCHAR", "Run id."),
    ("resolution", "INTEGER", "Steps per block: 100 or 1000."),
    ("step", "BIGINT", "The block's first step (a multiple of the resolution)."),
    ("layer", "SMALLINT", "MoE layer index."),
    ("expert", "SMALLINT", "Expert index."),
    ("capacity_factor", "DOUBLE", "The capacity factor (one of step_drops')."),
    ("assigned", "BIGINT", "Assignments of the expert in the block (rows with at least one)."),
    ("dropped", "BIGINT", "Assignments beyond capacity; NULL where any of the block's rows has unknown tokens."),
)

TABLES: dict[str, Table] = {t.name: t for t in (RUNS, LAYERS, ROUTES, STEP_STATS, LAYER_STATS, PAIR_STATS, FLOW_STATS,
                                                 SEQUENCES, EXPERT_BIAS, BALANCE_STATS, TOKEN_STATS, POSITION_STATS,
                                                 SEQUENCE_STATS, PROBE_SETS, TOKEN_SETS, WEIGHT_HIST, STEP_ROLLUPS,
                                                 LAYER_ROLLUPS, LAYER_BUCKETS, POOLED_BUCKETS, STEP_DROPS,
                                                 EXPERT_DROPS,
                                                 VOCAB)}

# Columns added after the first release of a table: a writer may leave them out (they read as NULL), so that
# code written against the older schema (RunWriter.write_flush callers) keeps working.
OPTIONAL_COLUMNS: dict[str, frozenset[str]] = {
    "routes": frozenset({"dropped", "margin"}),
    "sequences": frozenset({"seq_key", "sample_id", "pos_offset", "prompt_tokens"}),
    "layer_stats": frozenset({"adjacent_pairs", "same_first", "first_in_topk", "topk_overlap", "coactive_pairs",
                              "nonfinite_tokens", "ranks_summed"}),
}


# Columns a writer must give but may give as None (all NULL) or with NULL rows (NaN for floats): what a source does
# not know (an engine log has no gate weights, probabilities or slot order) stays unknown instead of read as 0.
NULLABLE_COLUMNS: dict[str, frozenset[str]] = {
    "routes": frozenset({"weight"}),
    "step_stats": frozenset({"tokens", "first_choice", "prob_sum", "dropped"}),
    "layer_stats": frozenset({"tokens", "z_loss_sum", "entropy_sum", "dropped"}),
}


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a bare | would end the cell."""
    return text.replace("|", "\\|")


def schema_markdown() -> str:
    """The schema as Markdown tables, for the README (kept in sync by a test)."""
    out: list[str] = []
    for t in TABLES.values():
        out.append(f"#### `{t.name}`\n\n{t.doc}\n\n| column | type | meaning |\n|---|---|---|")
        out += [f"| `{c.name}` | {c.sql_type} | {_cell(c.doc)} |" for c in t.columns]
        out.append("")
    return "\n".join(out)
