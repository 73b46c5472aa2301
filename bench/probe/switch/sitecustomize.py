import sys
sys.setswitchinterval(0.1)
