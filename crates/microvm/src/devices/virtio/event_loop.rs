//! The virtio event thread: one epoll loop over the queue-notify eventfds that KVM
//! signals (ioeventfd) when the guest writes a queue index to a transport's QueueNotify
//! register, and over the host-side fds devices register themselves (vsock sockets, a
//! tap) through their [`Registrar`], so queue and backend work runs off the vCPU threads.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::MmioTransport;
use super::Registrar;

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
const MAX_EVENTS: usize = 64;

fn lock(t: &Mutex<MmioTransport>) -> std::sync::MutexGuard<'_, MmioTransport> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

impl EventLoop {
    /// Starts the thread watching `queues`; every transport among them and in `others`
    /// (devices whose queues KVM signals to a back end directly, which still watch fds
    /// of their own) gets a [`Registrar`] for its device's own fds.
    pub fn start(
        queues: Vec<QueueEvent>,
        others: &[Arc<Mutex<MmioTransport>>],
    ) -> std::io::Result<Self> {
        let epoll = Arc::new(Epoll::new()?);
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        let mut transports: Vec<Arc<Mutex<MmioTransport>>> = Vec::new();
        for (i, q) in queues.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                q.evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        for t in queues.iter().map(|q| &q.transport).chain(others) {
            if !transports.iter().any(|x| Arc::ptr_eq(x, t)) {
                let dev = u16::try_from(transports.len()).map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "too many devices")
                })?;
                lock(t).attach(Registrar::new(epoll.clone(), dev));
                transports.push(t.clone());
            }
        }
        let stop_rx = stop.try_clone()?;
        let handle = std::thread::Builder::new()
            .name("virtio-events".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::Virtio);
                run(epoll, stop_rx, queues, transports)
            })?;
        Ok(EventLoop {
            stop,
            handle: Some(handle),
        })
    }
}

fn run(
    epoll: Arc<Epoll>,
    _stop: EventFd,
    queues: Vec<QueueEvent>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
) {
    let mut events = vec![EpollEvent::default(); MAX_EVENTS];
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
            let data = ev.data();
            if data == STOP {
                // Devices forget their fds before the loop's epoll goes away.
                for t in &transports {
                    lock(t).detach();
                }
                return;
            }
            if let Some((dev, token)) = Registrar::decode(data) {
                if let Some(t) = transports.get(usize::from(dev)) {
                    lock(t).handle_event(token, ev.event_set());
                }
                continue;
            }
            let Some(q) = queues.get(data as usize) else {
                continue;
            };
            // Draining the counter may fail with EAGAIN when another wake-up got it.
            let _ = q.evt.read();
            lock(&q.transport).notify_queue(q.queue);
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
