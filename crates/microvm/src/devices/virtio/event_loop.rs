//! The virtio event thread: one epoll loop over the queue-notify eventfds that KVM
//! signals (ioeventfd) when the guest writes a queue index to a transport's QueueNotify
//! register, so queue work runs off the vCPU threads.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::MmioTransport;

/// One watched queue: its notify eventfd, its transport and its index.
pub struct QueueEvent {
    /// Signalled by KVM on the guest's notify write.
    pub evt: EventFd,
    /// The device's transport.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Queue index.
    pub queue: u32,
}

/// The running event thread; stopped and joined on drop.
pub struct EventLoop {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

const STOP: u64 = u64::MAX;

impl EventLoop {
    /// Starts the thread watching `queues`.
    pub fn start(queues: Vec<QueueEvent>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        for (i, q) in queues.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                q.evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let stop_rx = stop.try_clone()?;
        let handle = std::thread::Builder::new()
            .name("virtio-events".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::Virtio);
                run(epoll, stop_rx, queues)
            })?;
        Ok(EventLoop {
            stop,
            handle: Some(handle),
        })
    }
}

fn run(epoll: Epoll, _stop: EventFd, queues: Vec<QueueEvent>) {
    let mut events = vec![EpollEvent::default(); queues.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio event loop: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == STOP {
                return;
            }
            let Some(q) = queues.get(ev.data() as usize) else {
                continue;
            };
            // Draining the counter may fail with EAGAIN when another wake-up got it.
            let _ = q.evt.read();
            q.transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .notify_queue(q.queue);
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
