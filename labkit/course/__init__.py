"""The course layer: what the notebooks teach with, built on the client core.

checks and grading (points that survive papermill), assign (student editions), runbook (executing the
course), isolation and security (the matrices of labs 02, 07 and 08), bench (the overhead experiments),
published (the figures quoted beside ours), plotting (the one chart style), orchestrate (lab 09's cluster
helpers), notebooks and translate (the notebooks' sources, and the Korean edition built from them).

Imports :mod:`labkit.wire` and :mod:`labkit.client`; never the agent. Host-side dependencies
(pandas, matplotlib, papermill) are allowed here.
"""
import os

#: the course's notebooks (the solution editions), in the checkout beside this package
NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "notebooks")
