"""The lab: measurements of seg_dist (speed, scaling, results against the seed tutorial), not part of it.

Runs from a clone's root (`python -m lab.bench ...`); uses seg_dist only through the public names that
lab/README.md lists.
"""
