"""appliance: a self-hosted ML platform for one machine, an edge box or a small cluster.

Only the version lives here so that `import appliance` stays cheap for the CLI.
"""

__version__ = "0.1.0"
