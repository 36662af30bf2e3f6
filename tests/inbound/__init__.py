"""
Tests of the inbound side.
"""
