"""Guidance sweeps: the parameter grid (:mod:`.sweep_grid`), sampling on Ray actors
(:mod:`.sample_actors`), the results store that lets a rerun skip finished points
(:mod:`.point_store`), the table (:mod:`.sweep_table`), the pictures
(:mod:`.sweep_plots`) and ``run_sweep`` tying them together (:mod:`.runner`).
"""
