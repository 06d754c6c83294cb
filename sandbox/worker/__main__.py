"""Entry point: `python -m sandbox.worker` in a checkout, `python -I -B <this directory>` inside a sandbox.

The sandboxes run Python isolated (`-I`: no PYTHONPATH, no script or working directory on sys.path, so nothing a
job writes to /tmp can be imported). Started as a directory, Python puts only that directory on sys.path and runs
this file as a top-level script; its parent takes that place on sys.path so the directory imports as a package (named
after the directory, e.g. `worker` under /opt/etpo) and its modules keep their relative imports.
"""

import os
import sys

if __package__:
    from .main import main
else:
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        sys.path[0] = os.path.dirname(_here)
    else:
        sys.path.insert(0, os.path.dirname(_here))
    main = __import__(os.path.basename(_here) + ".main", fromlist=["main"]).main

if __name__ == "__main__":
    sys.exit(main())
