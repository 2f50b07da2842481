"""``vlmfast search``: find, for a model and a visual-token budget, the policy whose outputs stay closest to
the unpruned model's on dev calibration data (the answer distributions' KL, or VFlowOpt's hidden-state
cosine), seeded with the hand-written baselines at the budget, and write the policy file.

    vlmfast search --model tiny-llava-shapes --budget 0.25 --methods fopru,vflowopt,zipvl,fastv \\
                   --data shapes:dev:64 --trials 40 --out policies/tiny-llava-shapes-search.yaml

Modules: :mod:`.data` (calibration data), :mod:`.space` (per-method search spaces under the budget),
:mod:`.objective` (the objective, the budget's unit, accuracy), :mod:`.run` (the Optuna study, resuming,
the CLI), :mod:`.report` (YAML, CSV, Pareto plot). docs/search.md.
"""

from .data import CalibrationData, Sample, load_data
from .objective import last_hidden, visual_share
from .run import SearchConfig, SearchResult, describe_space, run
from .space import SpaceContext, parse_methods, space_for

__all__ = ["run", "SearchConfig", "SearchResult", "describe_space", "load_data", "CalibrationData", "Sample",
           "SpaceContext", "space_for", "parse_methods", "last_hidden", "visual_share"]
