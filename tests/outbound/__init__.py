"""
Tests of the outbound side.
"""
