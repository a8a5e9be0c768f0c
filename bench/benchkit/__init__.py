"""Support code for bench/run.py: throwaway token, servers, runs and the report.

Standard library only, so the harness runs with any Python 3.11 (no venv needed).
"""
