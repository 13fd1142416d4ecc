"""netplane.ingress"""
