"""Every default a user can override, in one place. `Point`, `StudySpec`, `Protocol` and the
command line's help read them from here; nothing else spells a default value.

A figure's reason sits beside it; docs/concepts.md and docs/cli.md quote them."""

# ---- the workload of one point
MODEL = "small-moe"  # `moerun` alone: this preset and its twins on every available backend
PROMPT_TOKENS = 64
NEW_TOKENS = 32
BATCH_SIZE = 1
REPETITIONS = 5  # sequential rounds: timed repetitions inside a round's process
WARMUP = 1
SEED = 0
CHECKPOINT_DTYPE = "float32"
ROUTER_SKEW = 0.0
# which experts tokens choose (moerun.routing): "random" is what random router weights do,
# nothing planted (measured near-uniform, no locality; docs/concepts.md, "Routing")
ROUTING = "random"
# seconds before a point's process is killed: it prepares its engine artifact too, and a real
# shape's conversion and quantisation take minutes on two cores
TIMEOUT_S = 1800.0

# ---- the protocol (moerun.protocol; docs/concepts.md, "The measurement protocol")
MIN_ROUNDS = 2
MAX_ROUNDS = 12
TARGET = 0.03  # relative 95 % half-width of every verdict; 0: min_rounds only
BUDGET_S = 150.0  # seconds the rounds after the first may take (`moerun`, `moerun run`)
STUDY_BUDGET_S = 600.0  # the same for a study file or preset, whose grids are larger
IF_BUSY = "warn"
WAIT_S = 120.0  # longest wait for a quiet machine with --if-busy wait
LOCKSTEP = True
# seconds one timed lockstep unit aims at (moerun.lockstep): a unit's noise hardly shrinks
# with its length on these machines, so units are short (docs/concepts.md)
UNIT_S = 0.05

# ---- where results go
OUTPUT_DIR = "moerun-results"
