//! Empty programs of every type the agent attaches: the baseline that `cargo xtask bench`
//! measures the agent's programs against (the same hooks run for the same connection, doing
//! nothing). Not used by the agent.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};

#[cgroup_sock_addr(connect4)]
pub fn knhk_bench_empty_connect4(_ctx: SockAddrContext) -> i32 {
    1
}

#[cgroup_sock_addr(connect6)]
pub fn knhk_bench_empty_connect6(_ctx: SockAddrContext) -> i32 {
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn knhk_bench_empty_sendmsg4(_ctx: SockAddrContext) -> i32 {
    1
}

#[sock_ops]
pub fn knhk_bench_empty_sockops(_ctx: SockOpsContext) -> u32 {
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
