"""The program's modes, one module each; `main.py` parses the command line and calls one of them.

Each mode wires config -> data -> model -> objective -> trainer -> evaluation for its purpose and
takes the resolved, frozen configuration plus the command line's own options.
"""
