"""A run from plan to report, as library code that the CLI and the Python API both call: the run loop (``loop.py``:
plan, lease DST, stream the graph, commit units, report), the nightly job and its state (``nightly.py``,
``nightly_state.py``), stopping on Ctrl-C and SIGTERM (``stopping.py``), the progress line and the quiet console
(``progress.py``, ``console.py``) and the HTML report (``report.py``)."""
