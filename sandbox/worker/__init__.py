"""The warm worker: the process that lives inside the isolation boundary and runs agent programs.

It imports the data-science stack once, then serves jobs read from stdin (framed messages, see `encode_frame`).
Each job runs in a fresh forked child with resource limits, an unprivileged uid (when the worker may switch uids),
a private empty working directory and a wall-clock deadline enforced from here (the worker kills every process the
job left). Each fold of a job runs in a child of its own (a fold's training rows are other folds' evaluation rows).
Children are forked by a fork server (`Zygote`) that has seen no job, and are ready, privileges dropped, before
their job arrives (`Worker.prepare`). The answer goes out as soon as the result is complete; the cleanup follows
(`Worker.finish`). Results travel back as JSON plus `.npy` arrays; nothing is pickled in either direction.

Modules: `wire` (framing and the fold codec; the only part the host imports, so both ends always agree),
`child` (the job child's side), `supervisor` (the fork server and the worker's supervision of each child) and
`main` (the process: imports, warm-up, request loop). The package is deployed as a unit (stdlib + numpy, pandas
lazily; relative imports only) into the container image and the local sandbox, and started as
`python -I -B <package directory>` (see `__main__`).
"""
