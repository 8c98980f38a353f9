"""The Ray Data graph: the stages as plain functions and thin Ray classes (``stages.py``), the only module that calls
``map_batches`` and sets Ray resources (``build.py``), the models built once per actor (``models.py``), pool sizes and
the throughput model (``capacity.py``), the memory budget (``memory.py``), a user's dataset turned into record rows
and back (``dataset.py``) and the simulated GPU restorer (``simulate.py``)."""
