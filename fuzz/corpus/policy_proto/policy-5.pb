
K
	no-telnet"kubepods/besteffort*
10.0.0.0/8*fd00::/82232	8000-80808 