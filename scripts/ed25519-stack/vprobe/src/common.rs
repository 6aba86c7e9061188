//! Vector table, panic handler and the inputs (opaque to the optimizer).
#[used]
#[unsafe(link_section = ".vector_table.reset_vector")]
static RESET_VECTOR: extern "C" fn() -> ! = crate::Reset;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// An offer-sized message (in RAM on a device: the receive buffer).
pub static mut MSG: [u8; 1024] = [0; 1024];

/// Runs `f(pk, msg, sig)` on inputs the optimizer cannot see through.
#[macro_export]
macro_rules! probe {
    ($f:path) => {
        #[unsafe(no_mangle)]
        #[allow(non_snake_case)]
        pub extern "C" fn Reset() -> ! {
            use core::hint::black_box;
            let pk: [u8; 32] = black_box([0x11; 32]);
            let sig: [u8; 64] = black_box([0x22; 64]);
            let msg: &[u8] = unsafe { &*core::ptr::addr_of!(common::MSG) };
            let n = black_box(msg.len());
            loop {
                black_box($f(&pk, &msg[..n], &sig));
            }
        }
    };
}
