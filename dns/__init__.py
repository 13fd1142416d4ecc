"""netplane.dns"""
