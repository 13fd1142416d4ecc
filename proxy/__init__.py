"""netplane.proxy"""
