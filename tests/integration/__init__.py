"""
Real-socket tests with real clients and peers on 127.0.0.1.
"""
