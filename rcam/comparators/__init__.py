"""comparators"""
