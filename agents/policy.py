"""The import path of the LM policy before it became the `agents.lm` package; kept so user code keeps working.
The project itself imports from `agents.lm`."""

from agents.lm import *  # noqa: F403
from agents.lm import __all__  # noqa: F401
